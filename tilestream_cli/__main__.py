import sys

from tilestream_cli import main

sys.exit(main())

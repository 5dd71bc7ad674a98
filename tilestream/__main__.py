import sys

from tilestream.cli import main

sys.exit(main())

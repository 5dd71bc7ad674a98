"""The stream processor: decrypt frames, split them into tiles, compute tile features (Faust)."""

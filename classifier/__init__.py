"""The classifier: assemble each frame from its tiles, run the model, emit one result per frame."""

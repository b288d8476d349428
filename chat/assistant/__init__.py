"""The chat assistant: providers behind one small API (see `base`)."""

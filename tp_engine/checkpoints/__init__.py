"""Where checkpoints come from: what a `model` string names (a path, a built-in, a hub id) and
the random tiny checkpoints made on first use. How a checkpoint is read is model/'s."""

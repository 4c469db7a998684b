"""What runs the model and changes it: engine directories, backends, the engine worker, hot swap."""

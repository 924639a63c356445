"""Files: reading models safely, saving them, planning output paths, example inputs."""

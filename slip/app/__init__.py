"""The app: turns configs into runs. Entry points, config checks and migrations, run directories and resume, the
engine and its telemetry, the training data pipeline. It imports the library (`slip`), never the reverse."""

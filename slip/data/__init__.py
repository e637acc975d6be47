"""The data wing: sources and streams of image-text pairs, views, batching; `build_train_data` is the way in."""
from slip.data.train_data import DataSettings, TrainData, build_train_data

__all__ = ["DataSettings", "TrainData", "build_train_data"]

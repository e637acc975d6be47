"""The data wing of the library: sources and streams of image-text pairs, decoding, views and batching.

The app's `slip.app.train_data.build_train_data` turns a `data` config node into a training loader from these parts.
"""

"""Map-style sources, one module per published layout, each behind the `Source` protocol.

Adding a layout means adding one module here (a class with ``__len__`` and ``load(index)``; `FileSource` does the
work for layouts of image files plus captions) and one `conf/data/*.yaml` that targets it.
"""
from slip.data.sources.base import FileSource, PackedRecords, Source
from slip.data.sources.coco import CocoCaptionsSource
from slip.data.sources.conceptual import ConceptualCaptionsSource
from slip.data.sources.csv import CsvSource
from slip.data.sources.redcaps import RedCapsSource
from slip.data.sources.yfcc import YFCC15MSource

__all__ = ["CocoCaptionsSource", "ConceptualCaptionsSource", "CsvSource", "FileSource", "PackedRecords",
           "RedCapsSource", "Source", "YFCC15MSource"]

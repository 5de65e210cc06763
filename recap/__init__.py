"""recap as a library: a store's videos, captions, ground truth, features and metrics, in pandas and xarray.

    import recap

    store = recap.open_store("recap-store/demo")
    store.videos                                  # the registry
    store.captions("segment", video_id="...")     # the current version's rows; version="segment-..." for another
    store.features("...")                         # xarray: cls (window, channel), tokens, windows
    store.metrics()                               # what `recap evaluate` and the demo wrote
"""

from recap.reader import StoreReader, open_store

__all__ = ["StoreReader", "open_store"]

"""The knowledge store: manifests, generic source readers, the HDF5 store, training datasets.

``open_store`` and ``ingest`` need only numpy and h5py; ``StoreDataset`` imports torch when it
is first used, so that ``import tzkcli.store`` stays light for the command line.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tzkcli.store.manifest import Manifest, load_manifest, parse_manifest
from tzkcli.store.reader import DEFAULT_SHAPE, FORMAT_NAME, FORMAT_VERSION, Store, open_store
from tzkcli.store.writer import IngestReport, SourceOutcome, ingest, parse_shape

if TYPE_CHECKING:
    from tzkcli.store.dataset import StoreDataset

__all__ = [
    "DEFAULT_SHAPE", "FORMAT_NAME", "FORMAT_VERSION", "IngestReport", "Manifest",
    "SourceOutcome", "Store", "StoreDataset", "ingest", "load_manifest", "open_store",
    "parse_manifest", "parse_shape",
]


def __getattr__(name: str) -> Any:
    if name == "StoreDataset":
        from tzkcli.store.dataset import StoreDataset

        return StoreDataset
    raise AttributeError(f"module 'tzkcli.store' has no attribute {name!r}")

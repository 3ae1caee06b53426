"""Data: sources into pyarrow tables, partitioners, per-client splits, and the federated dataset."""

from rayfed.data.federated import FederatedDataset
from rayfed.data.info import ClientData, DatasetInfo
from rayfed.data.partition import partition_indices
from rayfed.data.plot import plot_label_distribution
from rayfed.data.sources import load_source

__all__ = [
    "ClientData",
    "DatasetInfo",
    "FederatedDataset",
    "load_source",
    "partition_indices",
    "plot_label_distribution",
]

"""Datasets: readers, long-tail subsets, split-neighbour protocols and their targets manifest, shot groups and the
decoded-array cache."""

from __future__ import annotations

from .arrays import as_array, fingerprint
from .base import ImageSet, ShardMember, open_image
from .longtail import long_tail_counts, make_long_tailed
from .protocol import PRESETS, Protocol, ProtocolConfig, build_protocol, split_record
from .readers import (
    load_dataset,
    read_cifar_pickles,
    read_image_folder,
    read_inat_json,
    read_omniglot,
    read_split_file,
    read_tiny_imagenet,
)
from .shots import shot_groups, shot_totals
from .targets import load_targets, write_targets

__all__ = [
    "PRESETS",
    "ImageSet",
    "Protocol",
    "ProtocolConfig",
    "ShardMember",
    "as_array",
    "build_protocol",
    "fingerprint",
    "load_dataset",
    "load_targets",
    "long_tail_counts",
    "make_long_tailed",
    "open_image",
    "read_cifar_pickles",
    "read_image_folder",
    "read_inat_json",
    "read_omniglot",
    "read_split_file",
    "read_tiny_imagenet",
    "shot_groups",
    "shot_totals",
    "split_record",
    "write_targets",
]

"""Converters from real datasets' own on-disk formats to setokim shards (paper Table 6)."""

from setokim.data.converters.coco import convert_coco
from setokim.data.converters.edit_pairs import convert_edit_pairs
from setokim.data.converters.img2dataset import convert_img2dataset
from setokim.data.converters.llava import convert_llava
from setokim.data.converters.refcoco import convert_refcoco
from setokim.data.converters.sa1b import convert_sa1b
from setokim.data.converters.vqa import convert_gqa, convert_vqav2

__all__ = [
    "convert_coco",
    "convert_edit_pairs",
    "convert_gqa",
    "convert_img2dataset",
    "convert_llava",
    "convert_refcoco",
    "convert_sa1b",
    "convert_vqav2",
]

"""Data: what proxykd holds data as and loads it through (``tensors``, ``loader``), data sets by name
(``named``), the authors' preprocessing and validation splits (``splits``), a user's image folders
(``folders``), text (``text``) and the augmentations beyond pad-and-crop and flips (``augment``). The names
below are the package's face: ``from kd.data import X``."""
from kd.data.tensors import (BatchTransform, DataSplit, DatasetInfo, ImageTensors, IndexedDataset, TensorLoader,
                             TensorSubset, as_dataset, augment_batch, check_labels, infer_num_classes)
from kd.data.text import TextOptions, load_text_folder
from kd.data.splits import paper_preprocess, reflect_pad, split_off_validation, stratified_holdout, validation_split
from kd.data.folders import ImageFiles, image_folder_path, load_image_folder
from kd.data.named import (FASHION_MNIST_DEBIAN, IDX_STEMS, REGISTRY, dataset_info, load_dataset, load_dataset_of_run,
                           mnist_folder)
from kd.data.loader import make_loader

__all__ = ["BatchTransform", "DataSplit", "DatasetInfo", "ImageTensors", "IndexedDataset", "TensorLoader",
           "TensorSubset", "as_dataset", "augment_batch", "check_labels", "infer_num_classes", "TextOptions",
           "load_text_folder", "paper_preprocess", "reflect_pad", "split_off_validation", "stratified_holdout",
           "validation_split", "ImageFiles", "image_folder_path", "load_image_folder", "FASHION_MNIST_DEBIAN",
           "IDX_STEMS", "REGISTRY", "dataset_info", "load_dataset", "load_dataset_of_run", "mnist_folder",
           "make_loader"]

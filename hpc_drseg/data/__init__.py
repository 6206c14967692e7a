"""Data: reading the DDR layout, synthetic DDR-like data, WebDataset shards, augmentation."""

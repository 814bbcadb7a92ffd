"""LightningDataModules that stream images (and their masks) for datus."""

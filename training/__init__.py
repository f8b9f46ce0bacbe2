"""Training stage: fine-tune an ImageNet backbone on a folder of photos and write a model bundle."""

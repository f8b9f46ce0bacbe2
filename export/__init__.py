"""Export stage: turn a model bundle into a verified, versioned model-repository entry."""

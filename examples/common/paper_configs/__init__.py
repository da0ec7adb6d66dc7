"""Architecture configs of the papers' models, from their model cards."""

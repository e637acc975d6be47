"""Data: readers (datasets), view recipes (transforms), the generated default dataset (synthetic), loaders."""

"""Layer machinery every backend shares: change lists, tar export and apply, state, IDs."""

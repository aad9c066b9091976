"""posts: posts, likes and snapshots of their authors."""

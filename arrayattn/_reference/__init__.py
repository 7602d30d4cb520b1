"""Array-API reference implementations (forward and backward) of every op: ``xp.*`` code only."""

"""What is kept and reviewed: the sample log, its SQLite store, `svd samples`, `svd review`."""

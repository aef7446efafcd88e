"""Storage: URLs, mounts and table names, and the file operations every stage needs."""

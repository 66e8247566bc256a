"""The local disk, touched safely: the download folder and its state, the atomic write, byte copies,
digests, the part cache, and the trainer's dependency-free resume helper. Knows no store."""

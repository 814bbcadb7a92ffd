"""The lowest layer: errors, settings and the option table, reading and writing files (files, io, and
tars for input in tar shards), ranks and worker processes; it imports nothing above it."""

"""The shard set: the contract between stage one (writes it) and stage two (reads it).

``format`` names and checks it, ``writer`` commits shards atomically and merges rank
listings, ``reader`` reads tars and opens a verified, complete set.
"""

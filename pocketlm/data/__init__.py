"""Data stages: read documents, prepare token shards; one module per stage."""

"""Worked examples of dsa_ops in real use: a CUDA-graph decode step (`decode_server`) and a torch.compile'd
training step that teaches the indexer which keys matter (`train_step`). See examples/README.md."""

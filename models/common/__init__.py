"""Parts shared by the model families: the DFS attention processor, layers, RoPE tables."""

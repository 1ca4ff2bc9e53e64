"""Parts shared by the model families: the DFS attention processor, device meshes (parallel),
layers, RoPE tables, latent/token grids and diffusers checkpoint reading."""

"""Image generation by diffusion."""

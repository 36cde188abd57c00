"""MemGen: a memory weaver that inserts generative latent tokens into a frozen reasoner (arXiv 2509.24704)."""

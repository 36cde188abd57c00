"""Methods other than MemGen: vanilla, SFT, RL baselines and retrieval memory."""

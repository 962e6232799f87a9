"""Meta-training of TrMRL policies with RL²-style PPO, and their meta-evaluation."""

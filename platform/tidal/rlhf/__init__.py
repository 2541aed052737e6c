"""RLHF: rollout engines, rewards, advantages, weight sync, the RL learner loop."""

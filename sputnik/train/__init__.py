"""Training: one loop (sputnik.train.loop) shared by pretraining, SFT, GRPO and distillation, plus metric plots."""

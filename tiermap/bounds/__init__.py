"""Lower bounds on a program's predicted time that no plan can beat: the per-step knapsack
(knapsack.py) and, tighter where a tier binds, the capacity LP (capacity_lp.py)."""

"""Where and when engines may start: pure policy (plan, placement, idle reaper, budget) and the two
executors that carry a plan out (one node's admission, the cluster's placement and seats)."""

"""Reports: results rendered for people (memory tables, plan plots); nothing here computes a cost."""

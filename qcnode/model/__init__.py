"""The MD-IQA network, its checkpoint format and the runtime scorer the daemon imports."""

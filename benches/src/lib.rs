//! Load generator and benchmarks for serin (see README.md in this folder).

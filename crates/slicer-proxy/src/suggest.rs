//! `slicer proxy suggest CLIENT`: the smallest set of allow rules covering what the audit log saw.

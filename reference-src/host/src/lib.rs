//! Shared host-side code for qmig-src and qmig-dst.

"""quantbridge's own INT4 kernels. Import the submodules directly; GPU kernels import lazily."""

# make image: the CPU image, built here offline (buildah over a debootstrap Debian 12 base; deploy/docker/README.md)
.PHONY: image

help::
	@echo "make image         the CPU container image as a docker archive under DSPARK_HOME/images (cached by content)"

image: install
	@bash deploy/docker/image.sh

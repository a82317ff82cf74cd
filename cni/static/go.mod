module merbridge/cni/static

go 1.19

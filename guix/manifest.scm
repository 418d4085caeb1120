;; The tools a sheepdog host needs: GEMMA for the scans, Python with sheepdog's
;; dependencies for its steps (kinship, LOCO, gather, permutations), ssh and coreutils.
;;   guix shell -m guix/manifest.scm          (on a host: guix package -m ... -p PROFILE)
(specifications->manifest
  (list "gemma"
        "python"
        "python-numpy"
        "python-pillow"
        "python-redis"
        "python-hiredis"
        "python-rq"
        "python-paramiko"
        "python-flask"
        "python-click"
        "coreutils"
        "gzip"
        "openssh"))

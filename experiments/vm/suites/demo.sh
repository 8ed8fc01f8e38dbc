# Suite "demo": load kdbt.ko and show what `kdbt caps` reports (as KDBT-INFO lines).

plan 3
check insmod insmod /lib/modules/kdbt.ko
caps=$(kdbt caps 2>&1); rc=$?
info "$caps"
if [ $rc -eq 0 ]; then pass caps lines="$(echo "$caps" | wc -l)"; else fail caps rc=$rc; fi
check rmmod rmmod kdbt

set terminal pngcairo size 900,560 font 'sans,11'
set output '.loss.png.tmp'
set grid
set key outside right top
set xlabel 'step'
set ylabel 'loss (nats/token): train EMA 0.9, validation points'
plot 'loss_rope.dat' using 1:2 with lines lw 2 lc 1 title 'rope', \
     'val_rope.dat' using 1:2 with points pt 7 ps 1.2 lc 1 title 'rope val', \
     'loss_alibi.dat' using 1:2 with lines lw 2 lc 2 title 'alibi', \
     'val_alibi.dat' using 1:2 with points pt 7 ps 1.2 lc 2 title 'alibi val', \
     'loss_fox.dat' using 1:2 with lines lw 2 lc 3 title 'fox', \
     'val_fox.dat' using 1:2 with points pt 7 ps 1.2 lc 3 title 'fox val', \
     'loss_grape-m.dat' using 1:2 with lines lw 2 lc 4 title 'grape-m', \
     'val_grape-m.dat' using 1:2 with points pt 7 ps 1.2 lc 4 title 'grape-m val', \
     'loss_grape-ap.dat' using 1:2 with lines lw 2 lc 5 title 'grape-ap', \
     'val_grape-ap.dat' using 1:2 with points pt 7 ps 1.2 lc 5 title 'grape-ap val'

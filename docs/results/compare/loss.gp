set terminal pngcairo size 900,560 font 'sans,11'
set output '.loss.png.tmp'
set grid
set key outside right top
set xlabel 'step'
set ylabel 'train loss (nats/token, EMA 0.9)'
plot 'loss_rope.dat' using 1:2 with lines lw 2 title 'rope', \
     'loss_alibi.dat' using 1:2 with lines lw 2 title 'alibi', \
     'loss_fox.dat' using 1:2 with lines lw 2 title 'fox', \
     'loss_grape-m.dat' using 1:2 with lines lw 2 title 'grape-m', \
     'loss_grape-ap.dat' using 1:2 with lines lw 2 title 'grape-ap'
